"""What runs leave behind: atomic files and locks, checkpoints, records, teacher weights."""
