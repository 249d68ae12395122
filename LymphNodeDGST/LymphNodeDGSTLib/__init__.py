"""LymphNodeDGSTLib: the core of the LymphNodeDGST Slicer extension.

Plain Python, importable without Slicer and without Qt. Data flows one way:
CT -> segmenter -> correction -> case library -> adaptation job -> model version -> segmenter.
"""

__version__ = "0.1.0"
