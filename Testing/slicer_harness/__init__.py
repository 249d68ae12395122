"""A harness that runs the Slicer module against Slicer 5.10.0's own Python code, real MRML and real
Qt widgets; docs/slicer-compatibility.md says what is real, what is a stand-in, and why."""
