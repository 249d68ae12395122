"""Demo and benchmark code: synthetic phantoms, the demo model training, `lndgst demo`, `bench adapt`.
Not needed by the Slicer module at run time (the demo model is found through demo_model)."""
