"""`python -m sweep`: compose the arms of a batch-size-scaling study, check them, run or submit them.

Importing this package must stay light (no torch): it runs on login nodes.
"""
