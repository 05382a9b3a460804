"""What each command does (bench, experiment, watch, compare, plan, doctor, clean): logic that
returns data. Printing and drawing live in kvmksm.views; argument parsing in kvmksm.cli."""
