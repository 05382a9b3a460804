"""What fills memory during a run: host processes or libvirt guests."""
