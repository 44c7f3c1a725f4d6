"""Checkpoint reading, synthetic checkpoints, the TP x PP planner and the engine builder."""
