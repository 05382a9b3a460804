"""kvmksm watch: the guest listers, the tracker that keeps the list current, and the session
that samples a live host into a run record without changing anything."""
