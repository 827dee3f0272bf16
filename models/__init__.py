"""The shipped model and its training log (docs/model.md), installed with the package as blurflow.models."""
