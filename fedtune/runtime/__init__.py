"""Process plumbing shared by every entry point: torch threads and devices, interrupts,
start-up progress lines, and the local Ray instance."""
