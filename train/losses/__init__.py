"""The self-supervised losses, one file each (`train/losses/<name>.py`), written as their papers define them, all
over the global batch with the autograd-aware collectives of train/losses/collectives.py, whose docstring gives the
gradient convention they share (call backward on the loss as it is, under DDP too). Each method's module
(train/methods/<name>.py) imports its own loss from its file; nothing is re-exported here.
"""
