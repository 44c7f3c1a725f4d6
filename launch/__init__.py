"""How a job's ranks start and end: the executors (this process alone, spawned ranks, mpirun or
srun's ranks, Ray actors), the one place that picks one, and reading a launcher's environment."""
