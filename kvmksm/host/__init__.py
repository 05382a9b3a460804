"""The host, read and written through one root that tests can redirect (``KVMKSM_ROOT``):
KSM sysfs, /proc readers, host facts, cgroups, the host lock and kvmksm's data folders.
Nothing here imports anything above it."""
