"""Small shared helpers: atomic files, devices, distributed set-up, seeding, logging."""
