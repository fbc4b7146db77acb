"""msif benchmarks: speed, memory and attribution quality, with recorded results."""
