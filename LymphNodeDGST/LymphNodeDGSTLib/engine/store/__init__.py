"""The model store: installed models and their numbered versions, results-folder checks,
checkpoints, site adapters, and the networks a version is built from."""
