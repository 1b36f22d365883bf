"""Device classes edgetune targets (profiles in the top-level ``devices/`` folder), the memory and
time plan of a bundle on one of them, and emulation of its limits on this machine. No torch."""
