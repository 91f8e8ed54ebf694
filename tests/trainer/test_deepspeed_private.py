"""Every DeepSpeed internal that ``trainer/deepspeed_private.py`` relies on, checked against the
installed DeepSpeed: an upgrade that moves one fails here, by name, instead of silently
changing clipping, gradient norms or the logged counters."""

from __future__ import annotations

import inspect

import pytest

deepspeed = pytest.importorskip("deepspeed")


def _source(obj) -> str:
    return inspect.getsource(obj)


def test_engine_clips_fp32_gradients_through_the_method_we_replace():
    from deepspeed.runtime.engine import DeepSpeedEngine

    step = _source(DeepSpeedEngine._take_model_step)
    assert "self.clip_fp32_gradients()" in step, "DeepSpeedEngine._take_model_step no longer calls clip_fp32_gradients"
    assert "self.gradient_clipping() > 0" in step
    assert callable(DeepSpeedEngine.clip_fp32_gradients)


def test_the_pipeline_engine_steps_through_the_same_path():
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.engine import PipelineEngine

    assert issubclass(PipelineEngine, DeepSpeedEngine)
    assert "_take_model_step" in _source(PipelineEngine._exec_optimizer_step)
    assert "_take_model_step" not in PipelineEngine.__dict__  # inherited, so our clipping applies


def test_the_pipeline_schedule_reaches_the_optimizer_step_through_the_map_we_replace():
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.pipe.schedule import OptimizerStep, TrainSchedule

    assert PipelineEngine._INSTRUCTION_MAP[OptimizerStep] is PipelineEngine._exec_optimizer_step
    assert "self._INSTRUCTION_MAP[type(cmd)]" in _source(PipelineEngine._exec_schedule)
    # The update is the last instruction, after the tied and data-parallel gradient reductions.
    last = [type(c).__name__ for c in list(TrainSchedule(micro_batches=2, stages=2, stage_id=0))[-1]]
    assert last[-3:] == ["ReduceTiedGrads", "ReduceGrads", "OptimizerStep"], last


def test_global_grad_norm_is_read_from_the_attribute_we_write():
    from deepspeed.runtime.engine import DeepSpeedEngine

    assert "return self._global_grad_norm" in _source(DeepSpeedEngine.get_global_grad_norm)
    init = _source(DeepSpeedEngine.__init__)
    assert "self._global_grad_norm = None" in init and "self.skipped_steps = 0" in init
    assert "self.skipped_steps += 1" in _source(DeepSpeedEngine._take_model_step)


def test_fp16_optimizers_expose_their_loss_scale():
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    assert isinstance(FP16_Optimizer.__dict__["loss_scale"], property)
    for zero in (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3):
        assert isinstance(zero.__dict__["cur_scale"], property), zero.__name__


def test_parameter_marks_have_the_names_deepspeed_reads():
    from deepspeed.runtime import utils
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.pipe import module

    from trainer import deepspeed_private as ds_private

    assert PIPE_REPLICATED == ds_private.PIPE_REPLICATED
    # The second holder of a tied weight marks its copy (our gradient norm skips it).
    assert f"p.{ds_private.PIPE_REPLICATED} = True" in _source(module.PipelineModule._index_tied_modules)
    assert f"'{ds_private.TENSOR_PARALLEL}'" in _source(utils)


def test_our_replacement_keeps_the_norm_it_computes():
    from types import SimpleNamespace

    import torch

    from trainer.deepspeed_private import replace_fp32_clipping

    engine = SimpleNamespace(_global_grad_norm=None)
    replace_fp32_clipping(engine, lambda: torch.tensor(2.5))
    engine.clip_fp32_gradients()  # as _take_model_step calls it
    assert float(engine._global_grad_norm) == 2.5


def test_zero_links_optimizer_states_through_the_method_we_call():
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    for opt in (DeepSpeedZeroOptimizer, BF16_Optimizer):
        src = _source(opt._lazy_init_hp_params_optimizer_state)
        assert "self._hp_optimizer_states_linked = True" in src, opt.__name__
    # ZeRO-3 reads the state of its flat fp32 partition directly, no link to make.
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    partition = _source(DeepSpeedZeroOptimizer_Stage3._get_fp32_opt_state_partition)
    assert "fp32_param = self.fp32_partitioned_groups_flat[group_idx]" in partition
    assert "self.optimizer.state[fp32_param][optim_state_key]" in partition
    load = _source(DeepSpeedEngine._load_checkpoint)
    assert "self.global_steps = checkpoint['global_steps']" in load
    assert "self.global_samples = checkpoint.get('global_samples'" in load


def test_every_checkpoint_file_goes_through_the_engine_we_swap():
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.pipe.module import PipelineModule

    assert "self.checkpoint_engine.save(" in _source(DeepSpeedEngine._save_checkpoint)
    assert "self.checkpoint_engine.save(" in _source(DeepSpeedEngine._save_zero_checkpoint)
    assert "checkpoint_engine=self.checkpoint_engine" in _source(PipelineEngine.module_state_dict)
    assert "checkpoint_engine.save(" in _source(PipelineModule.save_state_dict)
    # Writing is left to save(): torch.save appears nowhere else on the save path.
    for fn in (DeepSpeedEngine._save_checkpoint, DeepSpeedEngine._save_zero_checkpoint):
        assert "torch.save(" not in _source(fn)


def test_fp16_wrappers_step_once_on_zero_gradients_and_keep_their_masters_where_we_undo_it():
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    assert "self.initialize_optimizer_states()" in _source(FP16_Optimizer.__init__)
    assert "self.initialize_optimizer_states()" in _source(FP16_UnfusedOptimizer.__init__)
    assert "self.optimizer.step()" in _source(FP16_Optimizer.initialize_optimizer_states)
    assert "self.optimizer.step()" in _source(FP16_UnfusedOptimizer.initialize_optimizer_states)
    assert "self.fp32_groups_flat" in _source(FP16_Optimizer.__init__)
    init = _source(FP16_UnfusedOptimizer.__init__)
    assert "self.fp32_groups" in init and "self.fp16_groups" in init
