let
  bb = builtins.path { path = ./bb; name = "busybox"; };
  sys = builtins.currentSystem;
  ca = name: attrs: script: derivation ({
    inherit name; system = sys; builder = "${bb}/sh"; args = [ "-c" script ];
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
  } // attrs);
in rec {
  c1 = ca "nb-c1" {} "set -e; mkdir $out; echo x > $out/n; echo $out > $out/self";
  c2 = ca "nb-c2" {} "set -e; mkdir $out; cat ${c1}/n > $out/n; echo ${c1} > $out/up; echo $out > $out/self";
  multi = ca "nb-multi" { outputs = [ "out" "dev" ]; } "set -e; mkdir $out $dev; echo ${c1} > $dev/c1; echo $dev > $out/dev";
  ia = derivation { name = "nb-ia"; system = sys; builder = "${bb}/sh"; args = [ "-c" "set -e; mkdir $out; echo ${bb} > $out/bb" ]; };
  ia2 = derivation { name = "nb-ia2"; system = sys; builder = "${bb}/sh"; args = [ "-c" "set -e; mkdir $out; echo ${ia} > $out/ia" ]; };
  fod = derivation { name = "nb-fod"; system = sys; builder = "${bb}/sh"; args = [ "-c" "printf fixed > $out" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "992a93455c71fedd36ac9bbc439952c041cf61445958472af479269b8d873513" ; };
  fodr = derivation { name = "nb-fodr"; system = sys; builder = "${bb}/sh"; args = [ "-c" "printf fixed > $out" ];
    outputHashMode = "recursive"; outputHashAlgo = "sha256"; outputHash = "sha256-mSqTRVxx/t02rJu8Q5lSwEHPYURZWEcq9Hkmm42HNRM="; };
  impure = derivation { name = "nb-impure"; system = sys; builder = "${bb}/sh"; args = [ "-c" "printf x > $out" ];
    __impure = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; };
  deferred = derivation { name = "nb-deferred"; system = sys; builder = "${bb}/sh"; args = [ "-c" "set -e; mkdir $out; echo ${c1} > $out/c1" ]; };
}
