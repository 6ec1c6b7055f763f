"""Plans: the manifest that describes a partition, and the analyses (memory, cost) written into it."""
