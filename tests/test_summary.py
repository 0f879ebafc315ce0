"""The fit-end summary shows perplexity only for tasks where it means something."""

from __future__ import annotations

from lit_qft.callbacks import QuantizedExport

REPORT = {
    "recipe": "QAT8da4w", "fit_seconds": 12.0, "float_loss": 0.6, "float_bytes": 2**20, "qat_loss": 0.61,
    "quantized_loss": 0.61, "quantized_bytes": 2**18, "quantized_modules": 8, "sqnr_reference": "fake-quantized",
    "sqnr_db": float("inf"), "loss_diff": 0.0, "precision": "32-true",
}


def test_language_modelling_summary_shows_perplexity(capsys):
    QuantizedExport()._print({**REPORT, "perplexity": True})
    out = capsys.readouterr().out
    assert "ppl 1.82" in out  # exp(0.6)
    assert "25% of float" in out


def test_classification_summary_hides_perplexity(capsys):
    QuantizedExport()._print({**REPORT, "perplexity": False})
    out = capsys.readouterr().out
    assert "ppl" not in out
    assert "val loss 0.6000" in out and "val loss 0.6100" in out
