"""What merging memory across guests means for their isolation: one text, said by `doctor`
and shown in run reports, so both say the same thing."""

SIDE_CHANNEL_NOTE = (
    "KSM shares identical pages between guests, and that sharing is a known side channel: "
    "a guest can tell from the time its writes take which pages another guest holds "
    "(CAIN 2015, Dedup Est Machina 2016), and Flip Feng Shui (2016) used it with Rowhammer to "
    "change a neighbour's memory. Merge only guests that trust each other; VMware turned "
    "page sharing between VMs off by default for this reason (KB 2080735). KSM itself is "
    "described in the kernel's Documentation/admin-guide/mm/ksm.rst."
)
