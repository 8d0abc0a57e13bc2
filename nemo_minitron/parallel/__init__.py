"""All parallel plumbing: process groups, the CPU support for megatron-core, TP/PP sharding, schedules."""
