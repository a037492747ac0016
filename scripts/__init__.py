"""Project scripts: code generation, certificates, local run, and the dev peers."""
