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
from lit_qft.lora import LoraSettings, add_lora, float_base_weights, merge_and_quantize
from lit_qft.memory import TrainingMemory
from lit_qft.init import InitScheme, apply_init
from lit_qft.optim import (
    DecayStrategy, build_schedule, call_scheduler_factory, parameter_groups, total_steps_of,
)
from lit_qft.resume import check_checkpoint, model_signature
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
        scheduler: Any torch LR scheduler by class path (``--model.scheduler=OneCycleLR
            --model.scheduler.max_lr=1e-3``), stepped every optimizer step; ``OneCycleLR``'s
            ``total_steps`` is filled from the run. Replaces ``lr_schedule`` and ``warmup`` when given.
        lr_schedule: Linear warmup then this decay, from ``transformers.get_scheduler``, stepped every
            optimizer step: ``cosine``, ``linear``, ``polynomial``, ``constant`` (after the warmup),
            ``cosine_with_restarts``, ``cosine_with_min_lr``, ``inverse_sqrt``, ``warmup_stable_decay``.
        warmup: Linear warmup, in optimizer steps (>= 1) or as a fraction of the run (< 1).
        weight_decay_strategy: ``no_decay_bias_norm_embedding`` (default: biases, LayerNorm/RMSNorm
            weights and embeddings get no weight decay), ``decay_all``, or ``custom`` (see
            ``no_decay_patterns``). The decayed group takes the optimizer's ``weight_decay``.
        no_decay_patterns: With ``weight_decay_strategy=custom``: regular expressions on parameter
            names (``re.search``) that get no weight decay, e.g. ``['bias$', 'ln_', 'wte']``.
        quantizer_lr: Learning rate of learned quantization ranges (QAT ``range_learning``), which
            form their own never-decayed group; null uses the optimizer's learning rate.
        lr_schedule_kwargs: Extra arguments of the schedule, e.g. ``{power: 2.0, lr_end: 1.0e-6}``
            for ``polynomial`` or ``{num_cycles: 2}`` for ``cosine_with_restarts``.
        total_steps: Length of the schedule in optimizer steps; null derives it from the Trainer
            (``max_steps``, or epochs x batches / ``accumulate_grad_batches``).
        init: ``pretrained`` (default when ``pretrained`` is set), ``scratch`` (the architecture's own
            random init, even for a pretrained model), or ``reinit_top_k`` (pretrained, but the top
            ``reinit_top_k`` transformer blocks re-initialized). Applied before quantization.
        reinit_top_k: Number of top transformer blocks to re-initialize with ``init=reinit_top_k``.
        classifier_init_std: Re-initialize a sequence-classification head (``score``) from
            N(0, std), e.g. ``0.001``, so training starts near uniform class probabilities.
        trust_remote_code: Allow code shipped with a hub model to run.
        task: What to train and report (:mod:`lit_qft.tasks`); ``null`` takes the DataModule's
            ``task`` (sentiment, translation...) or plain language modelling.
        compile: ``torch.compile`` the model for training (off by default: on CPU it paid 1.03-1.09x
            after 25-46 s of compiling). Converted models are not compiled here; see ``lit-qft generate``.
        lora: Train LoRA adapters over the frozen base instead of the whole model
            (``--model.lora.rank=8``, see :class:`lit_qft.lora.LoraSettings`); the recipe quantizes the
            base first (PTQ recipes, QLoRA-style) or fake-quantizes it (QAT + LoRA).
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
        no_decay_patterns: list[str] | None = None,
        quantizer_lr: float | None = None,
        lr_schedule_kwargs: dict[str, Any] | None = None,
        total_steps: int | None = None,
        init: InitScheme | None = None,
        reinit_top_k: int = 0,
        classifier_init_std: float | None = None,
        trust_remote_code: bool = False,
        task: Task | None = None,
        compile: bool = False,
        lora: LoraSettings | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "quantization", "task", "lora"])
        self.lora = lora
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
        self.model = self._build_model()
        check_compatible(self.model, self.tokenizer, self._trainer.datamodule if self._trainer else None)
        self.recipe = self.task.adapt_recipe(self.recipe)  # e.g. a classification head stays float
        if self.model.get_input_embeddings().num_embeddings < len(self.tokenizer):
            raise ValueError(
                f"tokenizer {hp.tokenizer!r} has {len(self.tokenizer)} tokens but the model's embedding has "
                f"{self.model.get_input_embeddings().num_embeddings}; use the model's own tokenizer"
            )
        # Initialization before prepare: QAT ranges (range_learning) start from these weights.
        self._apply_init(self.model)
        Q.prepare(self.model, self.recipe)
        if self.lora is not None:  # quantized (or fake-quantized) frozen base + trainable adapters
            self.model = add_lora(self.model, self.recipe, self.lora)
        # from_pretrained returns eval mode and Lightning keeps module modes as they are: without
        # this, fine-tuning a pretrained GPT-2 would run with dropout off.
        self.model.train(self.training)
        if self.hparams.get("compile"):
            self.model.compile()  # in place: same module, same state_dict keys

    def _build_model(self) -> torch.nn.Module:
        """The task's HF model, float, as configured (pretrained weights or a fresh config)."""
        hp = self.hparams
        return self.task.build_model(
            hp.pretrained, hp.architecture, hp.config_overrides, vocab_size=len(self.tokenizer),
            pad_token_id=self.tokenizer.pad_token_id, trust_remote_code=hp.trust_remote_code,
        )

    def _apply_init(self, model: torch.nn.Module) -> None:
        hp = self.hparams
        apply_init(model, hp.get("init"), hp.pretrained, hp.get("reinit_top_k", 0), hp.get("classifier_init_std"))

    @property
    def context_length(self) -> int:
        config = self.model.config
        return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings"))

    def convert(self) -> torch.nn.Module:
        """Convert the trained model to a real torchao-quantized model in place (once)."""
        if not self.converted:
            self.model._compiled_call_impl = None  # back to eager: the converted layers are new modules
            if self.lora is not None:  # merge the adapters, then (re-)quantize
                floats = self._float_base_weights()
                self.merged_through_float = len(floats)
                self.model = merge_and_quantize(self.model, self.recipe, floats)
            else:
                Q.convert(self.model, self.recipe)
            self.converted = True
        return self.model

    def _float_base_weights(self) -> dict[str, torch.Tensor]:
        """For LoRA over a PTQ base: the pretrained float weights the base was quantized from.

        Rebuilt from ``pretrained`` (not kept during training: a quantized base is there to save that
        memory) so the adapters merge into float weights, not onto the quantization grid
        (:func:`lit_qft.lora.merge_and_quantize`). Empty for QAT/float bases (their weights are
        float already) and for bases built from random initialization (nothing to rebuild them from).
        """
        hp = self.hparams
        if not (self.recipe.quantizes and not self.recipe.qat and hp.pretrained):
            return {}
        reference = self._build_model()
        with torch.random.fork_rng():  # a re-initialization draws random numbers: keep the run's stream
            self._apply_init(reference)
        Q.prepare(reference, self.recipe)  # the same Conv1D swap and head policy: the same layout and names
        return float_base_weights(self.model, reference)

    def configure_callbacks(self):
        # trainable parameters at fit start, peak training memory at the end (every recipe, LoRA or not)
        return [TrainingMemory()]

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
        checkpoint["lit_qft_model"] = model_signature(self.model)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Before any tensor is loaded: a checkpoint of another model/recipe is a one-line error.
        from lit_qft.export import recipe_to_dict

        path = self._trainer.ckpt_path if self._trainer is not None else None
        check_checkpoint(checkpoint, self.model, recipe_to_dict(self.recipe), path)

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
        """Decoded text, one string per example (:meth:`lit_qft.tasks.Task.predict_texts`): the
        translation for translation data, else the greedy continuation of the first 32 tokens."""
        return self.task.predict_texts(self.model, batch, self.tokenizer)

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
        hp = self.hparams
        groups = parameter_groups(self.model, hp.weight_decay_strategy, hp.get("no_decay_patterns"), hp.get("quantizer_lr"))
        optimizer = self.optimizer_factory(groups)
        total = lambda: total_steps_of(self.trainer, hp.get("total_steps"))  # noqa: E731 (only when needed)
        if self.scheduler_factory is not None:
            scheduler = call_scheduler_factory(self.scheduler_factory, optimizer, total)
        else:
            scheduler = build_schedule(optimizer, hp.lr_schedule, hp.warmup, total(), hp.get("lr_schedule_kwargs"))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
