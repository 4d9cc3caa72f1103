"""RuntimeService for x86 / ARM CPUs: loads artifacts and proves their quality."""
