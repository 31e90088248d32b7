"""Experiment entry points (source training, the GRASP runner) and their configs."""
