"""SolverService: GPTQ / RTN solves, on the GPU where there is one."""
