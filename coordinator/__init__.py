"""The trusted side, in four rooms (docs/ARCHITECTURE.md): ``rounds`` (posting to accepted
uploads), ``merging`` (accepted uploads to the next version), ``runs`` (a run's settings,
record and people) and ``views`` (what operators see); ``store`` and ``errors`` serve them all."""
