"""Test-only local Hugging Face Hub (write server + olah). See README.md."""
