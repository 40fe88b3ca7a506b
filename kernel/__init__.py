"""The aiosd kernel: the one process that owns the model, the process table and every shared resource."""
