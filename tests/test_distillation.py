"""Distillation recovery and the KL-to-dense metric: the loss, its gradient, the teacher, bad settings."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from rku_lightning.evaluation.metrics import KLToReference, token_kl
from rku_lightning.training.distillation import Teacher, distillation_loss

V = 11


def _labels(batch: int = 2, length: int = 6) -> torch.Tensor:
    labels = torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(1))
    labels[:, :2] = -100  # a masked prompt
    return labels


def test_kd_is_zero_with_zero_gradient_when_student_equals_teacher() -> None:
    teacher = torch.randn(2, 6, V, dtype=torch.float64)
    student = teacher.clone().requires_grad_(True)
    for temperature in (1.0, 2.0):
        out = distillation_loss(student, teacher, _labels(), temperature=temperature)
        assert out["loss"].item() == pytest.approx(0.0, abs=1e-12)
        (grad,) = torch.autograd.grad(out["loss"], student)
        assert grad.abs().max().item() < 1e-12


def test_kd_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 6, V, dtype=torch.float64)
    student = torch.randn(2, 6, V, dtype=torch.float64, requires_grad=True)
    labels = _labels()

    def loss(s: torch.Tensor) -> torch.Tensor:
        # token_kl computes in fp32; the check needs float64 end to end.
        valid = labels[:, 1:] != -100
        t = torch.log_softmax(teacher[:, :-1][valid] / 2.0, -1)
        q = torch.log_softmax(s[:, :-1][valid] / 2.0, -1)
        return (t.exp() * (t - q)).sum(-1).mean() * 4.0

    assert torch.autograd.gradcheck(loss, (student,))
    ours = distillation_loss(student, teacher, labels, temperature=2.0)["loss"]
    assert ours.item() == pytest.approx(loss(student).item(), rel=1e-5)
    (g_ours,) = torch.autograd.grad(ours, student)
    (g_ref,) = torch.autograd.grad(loss(student), student)
    torch.testing.assert_close(g_ours, g_ref.to(g_ours.dtype), rtol=1e-4, atol=1e-7)
    # Masked (prompt) positions carry no gradient: position t predicts t + 1, so t = 0 predicts a masked label.
    assert g_ours[:, 0].abs().max().item() == 0


def test_alpha_mixes_cross_entropy_in() -> None:
    torch.manual_seed(0)
    teacher, student, labels = torch.randn(2, 6, V), torch.randn(2, 6, V), _labels()
    pure = distillation_loss(student, teacher, labels, alpha=0.0)
    ce_only = distillation_loss(student, teacher, labels, alpha=1.0)
    half = distillation_loss(student, teacher, labels, alpha=0.5)
    assert ce_only["loss"].item() == pytest.approx(pure["ce"].item(), rel=1e-6)
    assert half["loss"].item() == pytest.approx(0.5 * pure["kd"].item() + 0.5 * pure["ce"].item(), rel=1e-6)


def test_token_kl_refuses_a_teacher_with_another_vocabulary() -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        token_kl(torch.randn(1, 4, V), torch.randn(1, 4, V + 1), _labels(1, 4))
    with pytest.raises(ValueError, match="temperature"):
        token_kl(torch.randn(1, 4, V), torch.randn(1, 4, V), _labels(1, 4), temperature=0.0)


def test_kl_metric_is_zero_for_the_model_itself_and_positive_after_pruning(tmp_path) -> None:
    from rku_lightning import StructuredPruner

    model = tiny_model("llama")
    teacher = Teacher(model)
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :3] = -100
    positions = torch.arange(10).expand(2, -1)
    metric = KLToReference()
    dense = teacher.logits(ids, mask, positions)
    metric.update(dense, model(input_ids=ids, attention_mask=mask).logits, labels)
    assert metric.compute().item() == pytest.approx(0.0, abs=1e-6)
    pruner = StructuredPruner(model, importance="magnitude", allocation="uniform")
    pruner.prune(0.3)
    metric.reset()
    with torch.no_grad():
        metric.update(teacher.logits(ids, mask, positions), model(input_ids=ids, attention_mask=mask).logits, labels)
    # A random tiny model is near-uniform, so its KLs are small; dense gives exactly 0 above.
    assert metric.compute().item() > 1e-6 and metric.tokens.item() == 2 * 7
    # The teacher is a copy: pruning the student left it dense.
    torch.testing.assert_close(teacher.logits(ids, mask, positions), dense, rtol=0, atol=0)


def test_teacher_dtype_and_frozen() -> None:
    teacher = Teacher(tiny_model("qwen2"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in teacher.model.parameters())
    assert not teacher.model.training


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"kd_temperature": 0.0}, "kd_temperature"),
        ({"kd_temperature": -1.0}, "kd_temperature"),
        ({"kd_alpha": 1.5}, "kd_alpha"),
        ({"kd_alpha": -0.1}, "kd_alpha"),
        ({"recovery": "mse"}, "recovery"),
        ({"teacher_dtype": "int8"}, "teacher_dtype"),
    ],
)
def test_bad_distillation_settings_fail_before_loading(kwargs, field) -> None:
    from rku_lightning.training.lightning_module import CausalLMPruningModule

    with pytest.raises(ValueError, match=field):
        CausalLMPruningModule(pretrained="/nonexistent/model/never/loaded", **kwargs)


def test_empty_trace_set_after_filtering_fails_with_the_field(tmp_path) -> None:
    """`trace_keep='correct'` on a model that solves nothing: a clear error before any training."""
    import lightning as L
    from test_train_cli import write_config

    from rku_lightning.training.datamodule import ReasoningDataModule
    from rku_lightning.training.lightning_module import CausalLMPruningModule

    write_config(tmp_path)
    data = tmp_path / "data"
    module = CausalLMPruningModule(pretrained=str(tmp_path / "tiny"), max_new_tokens=2, kl_to_dense=False)
    datamodule = ReasoningDataModule(train_data=str(data / "gsm8k"), val_data=str(data / "gsm8k"), ood_task=None,
                                     val_limit=2, max_length=320, train_source="self", trace_samples=4,
                                     trace_keep="correct", trace_max_new_tokens=2, trace_cache=str(tmp_path / "traces"),
                                     reference_traces=False)
    datamodule.trainer = L.Trainer(accelerator="cpu", logger=False)
    datamodule.trainer.strategy.connect(module)
    with pytest.raises(ValueError, match="trace_keep='all'"):
        datamodule.setup("fit")
