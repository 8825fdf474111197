# Copyright 2025 The peft_palora developers.
# Licensed under the Apache License, Version 2.0.
"""Front quality: an `evaluate` metric summarising a Pareto front learned by a preference-conditioned model.

The computations live in ``peft_palora.pareto``; this module only adapts them to ``evaluate``'s interface, so
the numbers are the library's own. ``evaluate.load`` copies this file into its module cache and imports the
copy, which is why it imports ``peft_palora`` absolutely (no relative imports).
"""

from __future__ import annotations

import datasets
import evaluate

from peft_palora.pareto import hypervolume, num_non_dominated, preference_consistency

_DESCRIPTION = """\
Front quality summarises a Pareto front obtained by evaluating one preference-conditioned model (for instance
a PaLoRA model) at several preferences. Each prediction is the vector of task objectives (losses or scores)
measured at one preference; each reference is that preference. It reports three measures:

- hypervolume: the volume of objective space dominated by the front and bounded by a reference point
  (exact, any number of objectives; larger is better);
- num_non_dominated: the number of distinct objective vectors that no other vector dominates;
- spearman_<task> and mean_spearman: the Spearman rank correlation between the preference weight of each
  task and that task's objective, oriented so that 1.0 means "more weight always gives a better objective"
  (the consistency of the preference-to-objective mapping). A constant column gives nan.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one objective vector per evaluated preference, shape (N, T);
        objective t belongs to task t.
    references (`list` of `list` of `float`): the preferences, shape (N, T), each on the probability simplex.
    reference_point (`list` of `float`): hypervolume reference point, one value per objective. Every
        prediction must be at least as good as it in every objective (otherwise a ValueError names the
        offending points). Required here or when loading: `evaluate.load(path, reference_point=[...])`.
    maximize (`bool` or `list` of `bool`, defaults to `False`): whether higher is better, for all objectives
        or per objective. Also orients the rank correlations. Can likewise be given when loading.
    task_names (`list` of `str`, *optional*): names used in the `spearman_<task>` keys; defaults to 0, 1, ...

Returns:
    hypervolume (`float`): exact hypervolume of the predictions with respect to `reference_point`.
    num_non_dominated (`int`): number of distinct non-dominated predictions.
    spearman_<task> (`float`): rank correlation between the task's preference weight and its objective.
    mean_spearman (`float`): mean of the per-task correlations.

Examples:
    >>> front_quality = evaluate.load("path/to/front_quality", reference_point=[1.0, 1.0])
    >>> results = front_quality.compute(
    ...     predictions=[[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]],
    ...     references=[[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]],
    ... )
    >>> round(results["hypervolume"], 6), results["num_non_dominated"], results["mean_spearman"]
    (0.33, 3, 1.0)
"""

_CITATION = """\
@inproceedings{dimitriadis2025palora,
  title     = {Pareto Low-Rank Adapters: Efficient Multi-Task Learning with Preferences},
  author    = {Dimitriadis, Nikolaos and Frossard, Pascal and Fleuret, Fran{\\c{c}}ois},
  booktitle = {International Conference on Learning Representations},
  year      = {2025},
  url       = {https://arxiv.org/abs/2407.08056}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FrontQuality(evaluate.Metric):
    """Hypervolume, number of non-dominated points and preference consistency of a front.

    ``reference_point``, ``maximize`` and ``task_names`` may be fixed when loading, so that the metric can
    sit in ``evaluate.combine`` (which forwards every compute argument to every module) without extra
    compute arguments; values passed to ``compute`` take precedence.
    """

    def __init__(self, reference_point=None, maximize=False, task_names=None, **kwargs):
        super().__init__(**kwargs)
        self.default_reference_point = reference_point
        self.default_maximize = maximize
        self.default_task_names = task_names

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("float64")),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2407.08056"],
        )

    def _compute(self, predictions, references, reference_point=None, maximize=None, task_names=None):
        reference_point = self.default_reference_point if reference_point is None else reference_point
        maximize = self.default_maximize if maximize is None else maximize
        task_names = self.default_task_names if task_names is None else task_names
        if reference_point is None:
            raise ValueError(
                "`reference_point` is required: pass it to compute() or to evaluate.load(..., reference_point=...)"
            )
        if len(predictions) != len(references):
            raise ValueError(
                f"got {len(predictions)} predictions but {len(references)} references; need one objective vector "
                "per preference"
            )
        results = {
            "hypervolume": hypervolume(predictions, reference_point, maximize=maximize),
            "num_non_dominated": num_non_dominated(predictions, maximize=maximize),
        }
        results.update(
            preference_consistency(references, predictions, higher_is_better=maximize, task_names=task_names)
        )
        return results
