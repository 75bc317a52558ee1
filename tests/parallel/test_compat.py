"""scalelm/compat.py, the one module that reaches into torch's, DeepSpeed's and megatron-core's internals: each field
it reads or replaces is still there, and the CPU redirection still covers every CUDA call on the megatron-core path
scalelm runs. An upgrade that moves one fails here, naming it, before the distributed tests fail without saying why.

The CPU redirection: the distributed parity tests run megatron-core's path on CPU ranks, so a call the redirection
misses fails them. This reads the megatron-core files scalelm's layers execute, and every torch.cuda name or
device="cuda" literal in them must be either redirected by compat.use_cpu or listed below as off the CPU path, with
the reason.
"""

import inspect
import re
from pathlib import Path

import deepspeed
import megatron.core
import pytest
import torch

from scalelm.compat import REDIRECTED

ON_OUR_PATH = [
    "tensor_parallel/layers.py", "tensor_parallel/mappings.py", "tensor_parallel/random.py",
    "tensor_parallel/cross_entropy.py", "tensor_parallel/utils.py", "transformer/transformer_layer.py",
    "transformer/attention.py", "transformer/mlp.py", "transformer/module.py",
    "models/common/embeddings/rotary_pos_embedding.py", "parallel_state.py",
]
OFF_THE_CPU_PATH = {
    "torch.cuda.amp.custom_fwd": "autocast decorators; on a CPU they only wrap the function",
    "torch.cuda.amp.custom_bwd": "autocast decorators; on a CPU they only wrap the function",
    "torch.cuda.CUDAGraph": "CUDA-graph-safe RNG, only with use_cudagraphable_rng",
    "torch.cuda.default_generators": "CUDA-graph-safe RNG, only with use_cudagraphable_rng",
    "torch.cuda.OutOfMemoryError": "caught in an except clause, never raised on a CPU",
    "torch.cuda.empty_cache": "only after an out-of-memory error",
    "torch.cuda.BFloat": "Float16Module's type checks, for GPU half precision only",
    "torch.cuda.FloatTensor": "Float16Module's type checks, for GPU half precision only",
    "torch.cuda.HalfTensor": "Float16Module's type checks, for GPU half precision only",
    "torch.cuda.synchronize": "timers and NCCL set-up, not used with gloo",
}


def cuda_uses() -> dict[str, set[str]]:
    root = Path(megatron.core.__file__).parent
    found: dict[str, set[str]] = {}
    for name in ON_OUR_PATH:
        text = (root / name).read_text()
        for use in re.findall(r"torch\.cuda\.[A-Za-z_]+(?:\.[A-Za-z_]+)?", text):
            use = use if use.startswith("torch.cuda.random.") or use.startswith("torch.cuda.amp.") else \
                ".".join(use.split(".")[:3])
            found.setdefault(use, set()).add(name)
        for _ in re.findall(r"""device\s*=\s*["']cuda["']|\.cuda\(\)""", text):
            found.setdefault('device="cuda"', set()).add(name)
    return found


def test_every_cuda_call_on_our_path_is_redirected_or_known_to_be_off_it():
    redirected = {name for name in REDIRECTED if name.startswith("torch.cuda.")}
    unexplained = {use: files for use, files in cuda_uses().items()
                   if use not in redirected and use not in OFF_THE_CPU_PATH}
    assert not unexplained, (
        f"megatron-core {megatron.core.__version__} calls CUDA where scalelm runs it on CPU: {unexplained}; "
        f"redirect it in scalelm/compat.py (use_cpu) or, if it is off the CPU path, explain it in OFF_THE_CPU_PATH")


def test_megatron_wrappers_we_replace_still_exist():
    import megatron.core.tensor_parallel.random as megatron_random

    for name in REDIRECTED:
        if name.startswith("megatron."):
            assert hasattr(megatron_random, name.rsplit(".", 1)[1]), f"{name} is gone: update scalelm/compat.py"


def test_torch_fields_are_there():
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    assert callable(getattr(_MultiProcessingDataLoaderIter, "_shutdown_workers", None)), \
        f"torch {torch.__version__}: DataLoader's iterator has no _shutdown_workers: update compat.shutdown_workers"
    assert callable(getattr(torch.distributed.distributed_c10d, "_get_default_store", None)), \
        f"torch {torch.__version__}: no distributed_c10d._get_default_store: update compat.default_store"


def source(module_or_class) -> str:
    return inspect.getsource(module_or_class)


@pytest.mark.parametrize("field, where", [
    ("_hp_mapping", "deepspeed.utils.mixed_precision_linkage"),  # compat.fragment, in_fragments
    ("_dp_group", "deepspeed.utils.mixed_precision_linkage"),
    ("ds_id", "deepspeed.runtime.zero.partition_parameters"),  # compat.zero3_partitioned
    ("ds_shape", "deepspeed.runtime.zero.partition_parameters"),  # compat.whole_shape
    ("ds_numel", "deepspeed.runtime.zero.partition_parameters"),  # compat.whole_numel
    ("not param.ds_active_sub_modules", "deepspeed.runtime.zero.partitioned_param_coordinator"),  # compat.zero3_whole
    ("def _invalidate_trace(self)", "deepspeed.runtime.zero.partitioned_param_coordinator"),
    ("def get_param_coordinator(self)", "deepspeed.runtime.zero.parameter_offload"),
    ("fp32_partitioned_groups_flat", "deepspeed.runtime.zero.stage3"),  # compat.flat_partitions
    ("self.loss_scaler", "deepspeed.runtime.zero.stage_1_and_2"),  # compat.loss_scaler_state
    ("self.global_steps += 1", "deepspeed.runtime.engine"),  # compat.engine_counts
    ("self.global_samples +=", "deepspeed.runtime.engine"),
    ("self.skipped_steps += 1", "deepspeed.runtime.engine"),
])
def test_deepspeed_sets_the_fields_compat_reads(field, where):
    import importlib

    assert field in source(importlib.import_module(where)), \
        f"DeepSpeed {deepspeed.__version__} no longer sets {field} in {where}: update scalelm/compat.py"


def test_deepspeed_methods_compat_calls_are_there():
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.pipe import schedule
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    version = f"DeepSpeed {deepspeed.__version__}"
    for cls in (DeepSpeedZeroOptimizer, BF16_Optimizer):  # compat.link_optimizer_state
        assert callable(getattr(cls, "_lazy_init_hp_params_optimizer_state", None)), \
            f"{version}: {cls.__name__} has no _lazy_init_hp_params_optimizer_state: update compat.link_optimizer_state"
    # compat.defer_pipeline_step and pipeline_step: train_batch runs _train_schedule() through _exec_schedule, which
    # asks the schedule for its buffers and iterates its steps; the optimizer step is its own instruction
    assert "self._exec_schedule(sched)" in source(PipelineEngine.train_batch) and \
        "sched = self._train_schedule()" in source(PipelineEngine.train_batch), \
        f"{version}: PipelineEngine.train_batch runs its schedule otherwise: update compat.defer_pipeline_step"
    assert "pipe_schedule.num_pipe_buffers()" in source(PipelineEngine._exec_schedule)
    assert PipelineEngine._INSTRUCTION_MAP[schedule.OptimizerStep] is PipelineEngine._exec_optimizer_step, \
        f"{version}: the pipeline's optimizer step is no longer _exec_optimizer_step: update compat.pipeline_step"


def test_deepspeed_names_a_pipeline_stage_as_model_build_reads_it():
    # model/build.py's canonical_parameters: a PipelineModule registers layer i as "i" and a tied one under
    # tied_modules.KEY; and compat.fragment reads the fragment's address and master through the hp mapping
    from deepspeed.runtime.pipe.module import PipelineModule
    from deepspeed.utils.tensor_fragment import tensor_fragment

    build = source(PipelineModule._build)
    assert "name = str(layer_idx)" in build and "self.tied_modules[layer.key] = layer.build()" in build, \
        f"DeepSpeed {deepspeed.__version__} names pipeline layers otherwise: update model/build.py canonical_parameters"
    assert "lp_fragment_address" in source(tensor_fragment) and callable(tensor_fragment.get_hp_fragment), \
        f"DeepSpeed {deepspeed.__version__}: the fragment mapping moved: update compat.fragment"


def test_megatron_reads_what_decoding_sets():
    """compat.sequence_parallel_off flips the `sequence_parallel` flag megatron's linears read in their forward; the
    decoder (generation/decode.py) fills a StaticInferenceContext's buffers itself, which the attention must take as its
    cache, and moves its offset."""
    from megatron.core.inference.contexts import StaticInferenceContext
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import Attention

    for linear in (ColumnParallelLinear, RowParallelLinear):
        assert "self.sequence_parallel" in inspect.getsource(linear.forward), linear
    adjust = inspect.getsource(Attention._adjust_key_value_for_inference)
    assert "self.layer_number not in inference_context.key_value_memory_dict" in adjust
    assert "inference_context.sequence_len_offset" in adjust
    context = StaticInferenceContext(2, 8)
    assert context.key_value_memory_dict == {} and context.sequence_len_offset == 0 and context.is_static_batching()
