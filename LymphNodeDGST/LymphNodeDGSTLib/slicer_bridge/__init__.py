"""What the Slicer module needs, without Qt: the panel state machine, MRML <-> arrays, the first-use
dependency plan. Tested with slicer-core."""
