"""What a run is and who takes part: settings, creation, fusion, the record on disk, credentials."""
