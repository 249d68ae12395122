"""The `lndgst` command line: the parser in main.py, one file per command group."""
