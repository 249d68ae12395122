"""Adaptation: DGST and the comparison policies, the trainer, the case library, the adaptation pipeline,
weight statistics, metrics and the report figure (cases -> new model version). Imports only the engine."""
