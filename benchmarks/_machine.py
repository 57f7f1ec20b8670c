"""What the benchmark scripts print about the machine they ran on (the package's own helpers)."""

from sasoftmax.utils import cpu_name, machine_info, vector_isa

__all__ = ["cpu_name", "vector_isa", "machine_info"]
