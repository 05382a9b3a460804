"""libvirt: the connection, base domains and clone XML, volumes, the clones of one run, boot
detection, base images (tiny and Debian), and cleanup of what kvmksm tagged."""
