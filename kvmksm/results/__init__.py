"""The results folders: the one owner of run records and experiment folders (their formats,
versions, reading and writing). Everything that reads or writes a record goes through here."""
