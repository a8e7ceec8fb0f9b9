#!/bin/bash
exec > /tmp/ftx/out.txt 2>&1
set -x
uname -r
modprobe -a nf_flow_table nf_flow_table_inet nft_flow_offload dummy ip_vs ip_vs_rr veth
lsmod | grep -i flow
ip netns add c; ip netns add l; ip netns add b
ip link add c0 netns c type veth peer name l0 netns l
ip link add l1 netns l type veth peer name b0 netns b
ip -n c addr add 10.9.1.2/24 dev c0; ip -n c link set c0 up; ip -n c link set lo up; ip -n c route add default via 10.9.1.1
ip -n l addr add 10.9.1.1/24 dev l0; ip -n l link set l0 up; ip -n l link set lo up
ip -n l addr add 10.9.2.1/24 dev l1; ip -n l link set l1 up
ip -n b addr add 10.9.2.2/24 dev b0; ip -n b link set b0 up; ip -n b link set lo up; ip -n b route add default via 10.9.2.1
ip netns exec l sysctl -w net.ipv4.ip_forward=1 net.netfilter.nf_conntrack_acct=1
ip netns exec b iperf3 -s -D -p 5201
sleep 1
ip netns exec l nft -f - <<'N'
table ip probe {
  flowtable ft { hook ingress priority filter; }
}
delete table ip probe
N
echo probe-rc=$?
ip netns exec l nft -f - <<'N'
table ip t {
  flowtable ft { hook ingress priority filter; devices = { l0, l1 }; counter; }
  chain prerouting { type nat hook prerouting priority dstnat; policy accept; ip daddr 10.9.9.9 tcp dport 5201 dnat to 10.9.2.2:5201; }
  chain forward { type filter hook forward priority filter; policy accept; meta l4proto tcp ct packets > 20 counter flow add @ft; }
}
N
echo rc=$?
ip netns exec l nft list ruleset
ip netns exec c iperf3 -c 10.9.9.9 -t 4 -J > /tmp/ftx/iperf-nft.json &
sleep 2.5
ip netns exec l conntrack -L
ip netns exec l conntrack -L -f ipv4 --dst-nat
ip netns exec l conntrack -L -o extended
wait
grep -m3 bits_per_second /tmp/ftx/iperf-nft.json | tail -1
ip netns exec l nft list ruleset | grep -i counter
# device list updates
ip -n l link add l2 type dummy
ip netns exec l nft add flowtable ip t ft '{ hook ingress priority filter; devices = { l2 }; }'
echo add-dev-rc=$?
ip netns exec l nft add flowtable ip t ft '{ hook ingress priority filter; devices = { l2, l0 }; }'
echo add-dup-rc=$?
ip netns exec l nft list flowtable ip t ft
ip -n l link del l2
ip netns exec l nft list flowtable ip t ft
ip netns exec l nft delete flowtable ip t ft '{ devices = { l0 }; }'
echo del-dev-rc=$?
ip netns exec l nft list flowtable ip t ft
ip netns exec l nft add flowtable ip t ft '{ hook ingress priority filter; devices = { l0 }; }'
ip netns exec l nft add flowtable ip t ft '{ hook ingress priority filter; devices = { nosuch }; }'
echo nosuch-rc=$?
ip netns exec l nft -j list flowtable ip t ft
# direct baseline and no-flowtable
ip netns exec l nft delete table ip t
ip netns exec c iperf3 -c 10.9.2.2 -t 3 -J | grep bits_per_second | tail -1
# IPVS with conntrack and a flowtable
ip -n l link add lb0 type dummy; ip -n l link set lb0 up; ip -n l addr add 10.9.9.9/32 dev lb0
ip netns exec l sysctl -w net.ipv4.vs.conntrack=1
ip netns exec l ipvsadm -A -t 10.9.9.9:5201 -s rr
ip netns exec l ipvsadm -a -t 10.9.9.9:5201 -r 10.9.2.2:5201 -m
ip netns exec c iperf3 -c 10.9.9.9 -t 3 -J | grep bits_per_second | tail -1
echo ipvs-plain-rc=$?
ip netns exec l nft -f - <<'N'
table ip t {
  flowtable ft { hook ingress priority filter; devices = { l0, l1 }; counter; }
  chain forward { type filter hook forward priority filter; policy accept; ct packets > 20 counter flow add @ft; }
  chain input { type filter hook input priority filter; policy accept; ct packets > 20 counter; }
}
N
ip netns exec c timeout 20 iperf3 -c 10.9.9.9 -t 4 -J > /tmp/ftx/iperf-ipvs.json &
sleep 2.5
ip netns exec l conntrack -L
ip netns exec l ipvsadm -Lnc
ip netns exec l nft list ruleset
wait
grep -E 'bits_per_second|error' /tmp/ftx/iperf-ipvs.json | tail -3
ip netns exec l nft list ruleset | grep counter
ip netns exec l ipvsadm -Ln --stats
ip netns exec l ipvsadm -C
ip netns exec l nft delete table ip t
# IPVS with a flowtable fed only from lb-like rules limited to DNATed flows (ct status dnat)
ip netns exec l nft -f - <<'N'
table ip t {
  flowtable ft { hook ingress priority filter; devices = { l0, l1 }; counter; }
  chain forward { type filter hook forward priority filter; policy accept; ct status dnat ct packets > 20 counter flow add @ft; }
}
N
ip netns exec l ipvsadm -A -t 10.9.9.9:5201 -s rr
ip netns exec l ipvsadm -a -t 10.9.9.9:5201 -r 10.9.2.2:5201 -m
ip netns exec c timeout 20 iperf3 -c 10.9.9.9 -t 3 -J | grep -E 'bits_per_second|error' | tail -2
ip netns exec l conntrack -L
ip netns exec l nft list ruleset | grep counter
echo done
