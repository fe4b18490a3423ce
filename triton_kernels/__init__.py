"""Triton kernels of fastfuse (installed as fastfuse.triton_kernels). Each <op>.py holds the @triton.jit
kernels of one op and their launchers; philox.py is the shared RNG."""
