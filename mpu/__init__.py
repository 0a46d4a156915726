"""Tensor model parallelism (generic; knows nothing of CPM-2). See docs/design.md "mpu"."""
from .cross_entropy import vocab_parallel_cross_entropy
from .initialize import (
    destroy_model_parallel,
    get_data_parallel_group,
    get_data_parallel_rank,
    get_data_parallel_ranks,
    get_data_parallel_world_size,
    get_model_parallel_group,
    get_model_parallel_rank,
    get_model_parallel_ranks,
    get_model_parallel_src_rank,
    get_model_parallel_world_size,
    initialize_model_parallel,
    model_parallel_is_initialized,
)
from .layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    init_method_normal,
    initialize_parallel_weight,
)
from .mappings import (
    copy_to_model_parallel_region,
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
    scatter_to_model_parallel_region,
)
from .random import MODEL_PARALLEL_RNG, RNGStatesTracker, checkpoint, get_rng_tracker, model_parallel_seed
from .utils import check_model_parallel_size, divide, split_tensor_along_last_dim, vocab_range

__all__ = [name for name in dir() if not name.startswith("_")]
