"""The volunteer: device detection, local training and the ``volunteer`` CLI."""
