"""Model checkpoints: tiny offline stand-ins (`tiny`) and one loading path for tiny and
real checkpoints alike (`loading`)."""
