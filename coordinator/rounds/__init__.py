"""A round from posting to its accepted uploads: the state machine, leases, the intake and its checks."""
