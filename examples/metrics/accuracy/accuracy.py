# Copyright 2026 The focal-hf authors. Licensed under the Apache License, Version 2.0.
"""Accuracy as an `evaluate` metric that loads from this folder, so the examples need no Hub access:
`evaluate.load("examples/metrics/accuracy")`. Same result as the Hub's `accuracy`."""

import datasets
import evaluate
import numpy as np


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to their reference.",
            citation="",
            inputs_description="predictions, references: lists of class indices.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}
