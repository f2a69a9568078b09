"""Running one engine over several processes: tensor parallelism (lanner.distributed.tensor_parallel)."""
from lanner.distributed.collectives import TensorParallelError
from lanner.distributed.tensor_parallel import TensorParallelRunner, make_runner

__all__ = ["TensorParallelError", "TensorParallelRunner", "make_runner"]
