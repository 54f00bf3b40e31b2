// tools/cli: the programs' command-line facade over CLI11. Each case parses a
// command line a user could type and checks the variables it fills, or the
// exit status a bad line gets (CLI11's: 0 for --help, non-zero for errors).
#include "cli/cli.hpp"

#include <gtest/gtest.h>

#include <optional>
#include <string>
#include <vector>

namespace {

using chorus::cli::Option;
using chorus::cli::Parser;

struct Vars {
  int n = 1;
  double grace = 3.0;
  unsigned long bytes = 0;
  std::uint16_t port = 0;
  std::string mode = "a";
  std::vector<std::string> env;
  bool verbose = false;
  bool tag = true;
};

// The parser of a small launcher-like program over `v`.
void declare(Parser& p, Vars& v) {
  p.add("-n,--np", v.n, "ranks").range(1, 16).show_default();
  p.add("--grace", v.grace, "seconds").non_negative().show_default();
  p.add("--bytes", v.bytes, "bytes").positive();
  p.add("--port", v.port, "port");
  p.add("--mode", v.mode, "mode").one_of({"a", "b"});
  p.add("-x,--env", v.env, "VAR=VALUE").one_value_per_use();
  p.flag("-v,--verbose", v.verbose, "more");
  p.flag("--tag,!--no-tag", v.tag, "tags");
}

std::optional<int> parse(Vars& v, std::vector<std::string> args) {
  Parser p("test program", "prog");
  declare(p, v);
  return p.parse(args, /*report=*/false);
}

TEST(Cli, FillsEveryKindOfVariable) {
  Vars v;
  const auto status = parse(v, {"-n", "4", "--grace=0.5", "--bytes", "4096", "--port", "29500",
                                "--mode", "b", "-x", "A=1", "--env", "B=2", "-v", "--no-tag"});
  EXPECT_FALSE(status.has_value());
  EXPECT_EQ(v.n, 4);
  EXPECT_DOUBLE_EQ(v.grace, 0.5);
  EXPECT_EQ(v.bytes, 4096u);
  EXPECT_EQ(v.port, 29500);
  EXPECT_EQ(v.mode, "b");
  EXPECT_EQ(v.env, (std::vector<std::string>{"A=1", "B=2"}));
  EXPECT_TRUE(v.verbose);
  EXPECT_FALSE(v.tag);
}

TEST(Cli, NoArgumentsKeepTheDefaults) {
  Vars v;
  EXPECT_FALSE(parse(v, {}).has_value());
  EXPECT_EQ(v.n, 1);
  EXPECT_DOUBLE_EQ(v.grace, 3.0);
  EXPECT_EQ(v.mode, "a");
  EXPECT_TRUE(v.tag);
}

TEST(Cli, HelpEndsTheProgramWithStatusZero) {
  Vars v;
  const auto status = parse(v, {"--help"});
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ(*status, 0);
}

TEST(Cli, ValuesOutsideTheirChecksAreRefused) {
  const std::vector<std::vector<std::string>> bad = {
      {"-n", "0"},          {"-n", "17"},    {"-n", "2.5"},   {"--grace", "-1"},
      {"--bytes", "0"},     {"--mode", "c"}, {"--port", "x"}, {"--port", "70000"},
      {"--no-such-option"}, {"-n"},          {"stray"},
  };
  for (const auto& args : bad) {
    Vars v;
    const auto status = parse(v, args);
    ASSERT_TRUE(status.has_value()) << args.front();
    EXPECT_NE(*status, 0) << args.front();
  }
}

TEST(Cli, RequiredOptionMustBeGiven) {
  int n = 0;
  Parser p("test program", "prog");
  p.add("-n", n, "ranks").required();
  const auto missing = p.parse(std::vector<std::string>{}, false);
  ASSERT_TRUE(missing.has_value());
  EXPECT_NE(*missing, 0);
}

TEST(Cli, ExcludedOptionsCannotBeGivenTogether) {
  std::string a, b;
  Parser p("test program", "prog");
  Option oa = p.add("--a", a, "a");
  p.add("--b", b, "b").excludes(oa);
  EXPECT_FALSE(p.parse(std::vector<std::string>{"--b", "y"}, false).has_value());
  Parser q("test program", "prog");
  Option qa = q.add("--a", a, "a");
  q.add("--b", b, "b").excludes(qa);
  const auto both = q.parse(std::vector<std::string>{"--a", "x", "--b", "y"}, false);
  ASSERT_TRUE(both.has_value());
  EXPECT_NE(*both, 0);
}

TEST(Cli, CountSaysWhetherAnOptionWasGiven) {
  int f = 2;
  std::string i = "1M";
  Parser p("test program", "prog");
  p.add("-f", f, "factor");
  p.add("-i,--stepbytes", i, "step");
  ASSERT_FALSE(p.parse(std::vector<std::string>{"-i", "4K"}, false).has_value());
  EXPECT_EQ(p.get("--stepbytes").count(), 1u);
  EXPECT_EQ(p.get("-f").count(), 0u);
}

TEST(Cli, ListOptionTakesTheWordsAfterItUnlessOnePerUse) {
  std::vector<std::string> colls, env;
  Parser p("test program", "prog");
  p.add("--coll", colls, "collectives");
  ASSERT_FALSE(p.parse(std::vector<std::string>{"--coll", "allreduce", "broadcast"}, false));
  EXPECT_EQ(colls, (std::vector<std::string>{"allreduce", "broadcast"}));

  Parser q("test program", "prog");
  q.add("-x", env, "env").one_value_per_use();
  const auto status = q.parse(std::vector<std::string>{"-x", "A=1", "B=2"}, false);
  ASSERT_TRUE(status.has_value());  // B=2 is a stray positional argument
  EXPECT_NE(*status, 0);
}

TEST(Cli, StopAtFirstPositionalLeavesTheProgramAndItsArguments) {
  int n = 0;
  bool v = false;
  Parser p("launcher", "launcher");
  p.add("-n", n, "ranks");
  p.flag("-v", v, "verbose");
  p.stop_at_first_positional();
  ASSERT_FALSE(p.parse(std::vector<std::string>{"-n", "3", "prog", "-v", "-n", "9", "x"}, false));
  EXPECT_EQ(n, 3);
  EXPECT_FALSE(v);  // "-v" after the program is the program's
  EXPECT_EQ(p.remaining(), (std::vector<std::string>{"prog", "-v", "-n", "9", "x"}));
}

TEST(Cli, ArgcArgvFormSkipsTheProgramName) {
  int n = 0;
  Parser p("test program");
  p.add("-n", n, "ranks");
  std::string a0 = "prog", a1 = "-n", a2 = "7";
  char* argv[] = {a0.data(), a1.data(), a2.data(), nullptr};
  ASSERT_FALSE(p.parse(3, argv, false).has_value());
  EXPECT_EQ(n, 7);
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
