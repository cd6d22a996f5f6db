"""Simulation layer: robosuite scenes, the object library, rendering and the gymnasium wrapper."""
