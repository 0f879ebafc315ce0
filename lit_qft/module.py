"""The LightningModule: a Hugging Face causal LM trained under a torchao quantization recipe."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric

from lit_qft import quantization as Q
from lit_qft.assets import load_tokenizer
from lit_qft.models import build_model
from lit_qft.optim import DecayStrategy, build_schedule, parameter_groups
from lit_qft.tasks import LanguageModeling, Task, check_compatible


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)


class LitCausalLM(L.LightningModule):
    """Fine-tune (or train from scratch) a Hugging Face causal LM under a quantization recipe.

    Reusable in any Lightning project: pass a recipe, give it batches of ``input_ids`` /
    ``attention_mask`` / ``labels`` (``-100`` = ignored), and call :meth:`convert` after training
    (the :class:`~lit_qft.callbacks.QuantizedExport` callback does it at the end of ``fit``).

    Args:
        pretrained: Hub id (``gpt2``), local folder, or built-in offline model (``smollm2-135m``).
            ``null`` trains ``architecture`` from scratch.
        architecture: Model type built from config when ``pretrained`` is null (``gpt2``, ``llama``...).
        config_overrides: Config fields for a model built from scratch, e.g. ``{n_layer: 2, n_embd: 128}``.
        tokenizer: Tokenizer name; the CLI links it to ``--data.tokenizer``.
        quantization: The recipe: ``NoQuantization``, ``QAT8da4w``, ``QATInt8WeightOnly``,
            ``PTQInt8WeightOnly``, ... (``--model.quantization=QAT8da4w --model.quantization.group_size=64``).
        optimizer: Any ``torch.optim`` optimizer (``--model.optimizer=AdamW --model.optimizer.lr=3e-4``).
        scheduler: Any torch LR scheduler by class path, stepped every optimizer step. Overrides
            ``lr_schedule`` when given.
        lr_schedule: ``transformers.get_scheduler`` name: ``cosine``, ``linear``, ``constant_with_warmup``,
            ``polynomial``, ``constant``...; stepped every optimizer step.
        warmup: Linear warmup, in steps (>= 1) or as a fraction of the run (< 1).
        weight_decay_strategy: ``no_decay_bias_norm_embedding`` (default) or ``decay_all``.
        trust_remote_code: Allow code shipped with a hub model to run.
        task: What to train and report (:mod:`lit_qft.tasks`); ``null`` takes the DataModule's
            ``task`` (sentiment, translation...) or plain language modelling.
        compile: ``torch.compile`` the model for training (off by default: on CPU it paid 1.03-1.09x
            after 25-46 s of compiling). Converted models are not compiled here; see ``lit-qft generate``.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        architecture: str = "gpt2",
        config_overrides: dict[str, Any] | None = None,
        tokenizer: str = "gpt2",
        quantization: Q.Recipe = Q.NoQuantization(),
        optimizer: OptimizerCallable = _default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        lr_schedule: str = "cosine",
        warmup: float = 0.05,
        weight_decay_strategy: DecayStrategy = "no_decay_bias_norm_embedding",
        trust_remote_code: bool = False,
        task: Task | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "quantization", "task"])
        self.recipe = quantization
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.model: torch.nn.Module | None = None
        self.tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        self.converted = False
        self.val_loss = MeanMetric()
        self._task = task
        self.task_metrics = torch.nn.ModuleDict()

    @property
    def task(self) -> Task:
        """The task: given, else the attached DataModule's ``task``, else language modelling."""
        if self._task is None:
            datamodule = self._trainer.datamodule if self._trainer is not None else None
            self._task = getattr(datamodule, "task", None) or LanguageModeling()
        return self._task

    def setup(self, stage: str) -> None:
        if not len(self.task_metrics):
            self.task_metrics = self.task.metrics()

    # ---------------------------------------------------------------- model
    def configure_model(self) -> None:
        """Build the HF model and prepare it for the recipe (idempotent, as Lightning requires)."""
        if self.model is not None:
            return
        hp = self.hparams
        self.model = self.task.build_model(
            hp.pretrained, hp.architecture, hp.config_overrides, vocab_size=len(self.tokenizer),
            pad_token_id=self.tokenizer.pad_token_id, trust_remote_code=hp.trust_remote_code,
        )
        check_compatible(self.model, self.tokenizer, self._trainer.datamodule if self._trainer else None)
        self.recipe = self.task.adapt_recipe(self.recipe)  # e.g. a classification head stays float
        if self.model.get_input_embeddings().num_embeddings < len(self.tokenizer):
            raise ValueError(
                f"tokenizer {hp.tokenizer!r} has {len(self.tokenizer)} tokens but the model's embedding has "
                f"{self.model.get_input_embeddings().num_embeddings}; use the model's own tokenizer"
            )
        Q.prepare(self.model, self.recipe)
        if self.hparams.get("compile"):
            self.model.compile()  # in place: same module, same state_dict keys

    @property
    def context_length(self) -> int:
        config = self.model.config
        return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings"))

    def convert(self) -> torch.nn.Module:
        """Convert the trained model to a real torchao-quantized model in place (once)."""
        if not self.converted:
            self.model._compiled_call_impl = None  # back to eager: the converted layers are new modules
            Q.convert(self.model, self.recipe)
            self.converted = True
        return self.model

    def _sync_fake_quant(self) -> None:
        """Delayed fake quantization: on from the recipe's start step, derived from ``global_step``.

        Nothing about it is stored, so a run resumed from any checkpoint switches at the same step.
        """
        if self.recipe.qat and not self.converted and self.recipe.fake_quant_after_steps:
            start = self.recipe.fake_quant_start_step(self.trainer.estimated_stepping_batches)
            Q.set_fake_quant(self.model, self.global_step >= start)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._sync_fake_quant()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit":
            self._sync_fake_quant()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The recipe is not a hyperparameter (it is an object); keep it as plain data so
        # ``lit_qft.convert_checkpoint`` can convert this checkpoint without the training config.
        from lit_qft.export import recipe_to_dict

        checkpoint["lit_qft_recipe"] = recipe_to_dict(self.recipe)

    # ---------------------------------------------------------------- steps
    def forward(self, **batch: torch.Tensor):
        return self.model(**batch)

    def _common_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        self._outputs = self.task.forward(self.model, batch)
        loss = self._outputs.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{stage} loss is {loss.item()} at step {self.global_step}; lower the learning rate "
                "or enable gradient clipping (--trainer.gradient_clip_val)"
            )
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._common_step(batch, "train")
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss = self._common_step(batch, "val")
        self.val_loss.update(loss, weight=self.task.loss_weight(batch))
        self.task.update_metrics(self.task_metrics, self.model, batch, self._outputs, self.tokenizer)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        if self.task.perplexity:
            self.log("val/ppl", torch.exp(loss), prog_bar=True, sync_dist=True)
        for name, metric in self.task_metrics.items():
            self.log(f"val/{name}", metric.compute(), prog_bar=True, sync_dist=True)
            metric.reset()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("test/loss", loss, sync_dist=True)
        self.log("test/ppl", torch.exp(loss), sync_dist=True)
        for name, metric in self.task_metrics.items():
            self.log(f"test/{name}", metric.compute(), sync_dist=True)
            metric.reset()

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[str]:
        """Greedy continuation of the first 32 tokens of each sequence (decoded text)."""
        prompt = batch["input_ids"][:, :32]
        out = self.model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return self.tokenizer.batch_decode(out[:, prompt.shape[1]:], skip_special_tokens=True)

    @torch.no_grad()
    def evaluate_loss(self, dataloader, max_batches: int | None = None) -> float:
        """Token-weighted mean loss over ``dataloader`` (no Lightning loop, works on converted models)."""
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            n = self.task.loss_weight(batch)
            total += float(self.task.forward(self.model, batch).loss) * n
            count += n
        self.model.train(was_training)
        return total / max(count, 1)

    # ---------------------------------------------------------------- optimization
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(parameter_groups(self.model, self.hparams.weight_decay_strategy))
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            total = int(self.trainer.estimated_stepping_batches)
            scheduler = build_schedule(optimizer, self.hparams.lr_schedule, self.hparams.warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
