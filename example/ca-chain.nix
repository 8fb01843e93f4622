# The main job's example: a two-step content-addressed chain built with a busybox from the host.
# `greeting` writes a file; `hello` copies it, refers to it and to itself. Nix resolves `hello`
# (replacing `greeting`'s placeholder with its real output path) before sending it to vouch.
{ tag ? "1" }:
let
  bb = builtins.path { path = ./bb; name = "busybox"; };
  ca = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "${bb}/sh";
    args = [ "-c" script ];
    __contentAddressed = true;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
  };
in rec {
  greeting = ca "vouch-greeting" ''
    echo "building the greeting inside the VM"
    echo "hello from a vouch VM (${tag})" > $out
  '';
  hello = ca "vouch-hello" ''
    echo "building hello inside the VM"
    ${bb}/busybox mkdir $out
    ${bb}/busybox cat ${greeting} > $out/greeting
    echo ${greeting} > $out/refers-to
    echo $out > $out/self
  '';
}
