"""Reading ldd and objdump output of a built llama-server (pure functions)."""

from __future__ import annotations

from tuner.server.libraries import LinkedLibrary, debian_packages, disallowed, glibc_required, parse_ldd

LDD = """\
\tlinux-vdso.so.1 (0x00007ffd6b7e4000)
\tlibgomp.so.1 => /lib/x86_64-linux-gnu/libgomp.so.1 (0x00007f3d1b5e9000)
\tlibstdc++.so.6 => /lib/x86_64-linux-gnu/libstdc++.so.6 (0x00007f3d1b200000)
\tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f3d1b50a000)
\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f3d1b4ea000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f3d1b01f000)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f3d1b64d000)
"""


def test_parse_ldd_names_every_library_with_its_path() -> None:
    libraries = parse_ldd(LDD)
    assert LinkedLibrary("libgomp.so.1", "/lib/x86_64-linux-gnu/libgomp.so.1") in libraries
    assert LinkedLibrary("ld-linux-x86-64.so.2", "/lib64/ld-linux-x86-64.so.2") in libraries
    assert LinkedLibrary("linux-vdso.so.1", None) in libraries
    assert len(libraries) == 7


def test_the_runtime_is_allowed_and_maps_to_debian_packages() -> None:
    libraries = parse_ldd(LDD)
    assert disallowed(libraries) == []
    assert debian_packages(libraries) == ["libc6", "libgcc-s1", "libgomp1", "libstdc++6"]


def test_extra_or_missing_libraries_are_refused() -> None:
    libraries = parse_ldd(LDD + "\tlibssl.so.3 => /lib/x86_64-linux-gnu/libssl.so.3 (0x1)\n"
                                "\tlibgomp.so.2 => not found\n")
    assert disallowed(libraries) == ["libgomp.so.2", "libssl.so.3"]


def test_glibc_required_is_the_newest_symbol_version() -> None:
    objdump = """
    0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.2.5) malloc
    0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.34) __libc_start_main
    0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.4) __stack_chk_fail
    0000000000000000      DF *UND*  0000000000000000 (GLIBCXX_3.4.9) _ZNSo9_M_insertIdEERSoT_
    0000000000000000      DF *UND*  0000000000000000 (GLIBCXX_3.4.30) _ZSt21__glibcxx_assert_failPKciS0_S0_
    """
    assert glibc_required(objdump) == {"glibc": "2.34", "glibcxx": "3.4.30"}
    assert glibc_required("") == {"glibc": "", "glibcxx": ""}
