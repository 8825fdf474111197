"""Evaluating a trained model's Pareto front: over a preference grid, as tables, plots and an ``evaluate`` metric."""
